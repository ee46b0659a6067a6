"""DDP on the CPU (gloo): a real 2-process ``insightedit fit``; ranks see distinct data and end with equal weights."""

import torch
from _training_runs import run_fit, small_config


# two processes import and build the system on 2 cores: ~25 s idle
def test_two_process_ddp_fit_shards_the_data_and_keeps_ranks_in_step(tmp_path):
    probe = {"class_path": "_training_runs.RecordRanks", "init_args": {"out_dir": str(tmp_path / "probe")}}
    config = small_config(tmp_path, "ddp", max_steps=2, every=2, extra_callbacks=[probe])
    run_fit(config, tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
            timeout=600)
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for step in range(2):  # each rank trained on its own shard: no source image in common
        a, b = ranks[0]["sources"][step], ranks[1]["sources"][step]
        assert not any(torch.equal(x, y) for x in a for y in b)
    assert ranks[0]["after"].keys() == ranks[1]["after"].keys() and len(ranks[0]["after"]) > 300
    for name, weight in ranks[0]["after"].items():
        assert torch.equal(weight, ranks[1]["after"][name]), name  # gradients were all-reduced
    changed = [n for n, w in ranks[0]["after"].items() if not torch.equal(w, ranks[0]["before"][n])]
    assert len(changed) > 100  # the steps happened
    assert torch.load(tmp_path / "ddp" / "last.ckpt", weights_only=False)["global_step"] == 2
