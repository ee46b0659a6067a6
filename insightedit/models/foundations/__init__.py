"""The foundation twins' math (no Lightning): the tiny CLIP (:mod:`.clip`) and the tiny MLLM (:mod:`.mllm`)."""
