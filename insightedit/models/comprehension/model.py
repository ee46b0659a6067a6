"""The comprehension model: LLaVA + LoRA reads the image and the instruction and answers with [MM] tokens.

``forward`` gives ``h``, the LLM's last-layer hidden states at the r [MM] positions (after the final
RMSNorm, i.e. ``hidden_states[-1]`` as SmartEdit reads it), the vision tower's patch features at
LLaVA's own ``vision_feature_layer`` (-2 for LLaVA-1.5, before the projector, CLS dropped) for the
bridge, and ``L_LLM``. Both come from the one LLaVA pass. Only the LoRA matrices and the new [MM] rows
train (see :mod:`insightedit.models.comprehension.tokens` for how the old rows stay frozen).

Members that have the MLLM write a text before the [MM] tokens (MGIE's expressive instruction) pass it
as ``answers``: it is teacher-forced before the [MM] tokens and ``L_LLM`` covers its tokens too;
:meth:`ComprehensionModel.generate_answers` writes it greedily at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

from insightedit.models.comprehension.prompts import IGNORE_INDEX, IMAGE_TOKEN, EncodedPrompts, PromptEncoder
from insightedit.models.comprehension.tokens import (
    NewRowsEmbedding,
    NewRowsHead,
    add_mm_tokens,
    install_mm_rows,
    mean_row,
    mm_token_names,
)
from insightedit.models.loading import PretrainedPart

MM_ROWS_FILE = "mm_embeddings.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


@dataclass
class ComprehensionOutput:
    """What the comprehension model hands the bridge."""

    h: torch.Tensor  # (B, r, d_llm) last-layer hidden states at the [MM] positions
    vision_features: torch.Tensor  # (B, P, d_vision) patch features for the bridge
    loss_llm: torch.Tensor | None  # NLL on the answer and [MM] tokens (None when compute_loss=False)
    mm_rows: torch.Tensor | None = None  # (B, r, d_llm) the [MM] tokens' input embeddings, when asked for


class ComprehensionModel(PretrainedPart, nn.Module):
    """LLaVA with r [MM] tokens and LoRA on its language model: (image, instruction) -> ``h``.

    Args:
        llava: a loaded (or meta-device) ``LlavaForConditionalGeneration``; possibly bitsandbytes-quantized.
        tokenizer: its tokenizer (``None`` only for a meta-device build, which cannot run forward).
        num_mm_tokens: r.
        lora: the LoRA config (``None``: no adapter; only the [MM] rows train).
        gradient_checkpointing: recompute the LLM's activations in the backward pass.
        quantized: the base is 4-/8-bit: prepare it with ``prepare_model_for_kbit_training``.
        first_mm_id: id of ``[MM0]`` when there is no tokenizer (meta build); ignored otherwise.
    """

    def __init__(
        self,
        llava: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase | None,
        num_mm_tokens: int = 32,
        lora: LoraConfig | None = None,
        gradient_checkpointing: bool = False,
        quantized: bool = False,
        first_mm_id: int | None = None,
    ) -> None:
        super().__init__()
        config: Any = llava.config  # LlavaConfig (typed loosely by transformers)
        vision = config.vision_config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("only a single vision_feature_layer is supported for the bridge's patch features")
        self.hidden_size = int(config.text_config.hidden_size)
        self.vision_hidden_size = int(vision.hidden_size)
        self.num_mm_tokens = int(num_mm_tokens)
        self.image_size = int(vision.image_size)
        grid = self.image_size // int(vision.patch_size)
        self.vision_grid = (grid, grid)
        self.vision_feature_layer = int(config.vision_feature_layer)
        self.mm_tokens = mm_token_names(num_mm_tokens)
        self.tokenizer = tokenizer
        if tokenizer is not None:
            first_mm_id = add_mm_tokens(tokenizer, num_mm_tokens)
        elif first_mm_id is None:
            first_mm_id = int(config.text_config.vocab_size)
        self.first_mm_id = int(first_mm_id)

        if quantized:
            llava = prepare_model_for_kbit_training(
                llava, gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        llava.requires_grad_(False)
        install_mm_rows(llava, self.first_mm_id, self.num_mm_tokens)
        self.llava: LlavaForConditionalGeneration | PeftModel = (
            get_peft_model(llava, lora) if lora is not None else llava
        )
        for parameter in self.trainable_parameter_groups()["mm_embeddings"]:
            parameter.requires_grad_(True)
        if gradient_checkpointing:
            llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        with_cls = int(config.vision_feature_select_strategy == "full")  # the projector then keeps CLS too
        self._image_token_id = int(config.image_token_id)
        self._image_positions = grid * grid + with_cls
        self._max_length = int(config.text_config.max_position_embeddings)
        self.prompts = self._prompt_encoder(tokenizer) if tokenizer is not None else None
        self.load_options: dict[str, Any] = {}  # set with ``pretrained`` by the builder: build_llava's arguments
        self.train()  # from_pretrained leaves models in eval mode; a fresh module starts in train mode

    def _prompt_encoder(self, tokenizer: PreTrainedTokenizerBase) -> PromptEncoder:
        return PromptEncoder(
            tokenizer, self.mm_tokens, self._image_token_id, self._image_positions, max_length=self._max_length
        )

    # ---------------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_pretrained(self) -> None:
        """Read the LLaVA weights ``pretrained`` names into this model (built from its config, on ``meta``).

        The base's tensors are taken as loaded (their dtype and device); the [MM] rows start again from
        the mean of the loaded rows and LoRA from its initialisation, as when LLaVA was loaded first.
        """
        if self.pretrained is None:
            return
        from insightedit.models.comprehension.presets import build_llava  # the presets build this class

        base = build_llava(pretrained=self.pretrained, **self.load_options)
        llava, tokenizer = base.model, base.tokenizer
        self._take_base_weights(llava)
        if self.tokenizer is None and tokenizer is not None:
            first = add_mm_tokens(tokenizer, self.num_mm_tokens)
            if first != self.first_mm_id:
                raise ValueError(f"comprehension.pretrained: [MM0] is id {first} in {self.pretrained}'s tokenizer, "
                                 f"the model was built for {self.first_mm_id}")
            self.tokenizer = tokenizer
            self.prompts = self._prompt_encoder(tokenizer)
        self._restart_new_weights()
        self.pretrained_loaded = True

    def _take_base_weights(self, llava: LlavaForConditionalGeneration) -> None:
        """Put ``llava``'s tensors in place of this model's base tensors (under the [MM] and LoRA wrappers)."""
        ours = dict(self.base_model.named_modules())
        taken: dict[int, nn.Parameter] = {}  # tied tensors stay one parameter
        named = [*llava.named_parameters(remove_duplicate=False), *llava.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            path, _, leaf = name.rpartition(".")
            module = next(
                (ours[c] for c in (path, f"{path}.base_layer", f"{path}.base")
                 if c in ours and (leaf in ours[c]._parameters or leaf in ours[c]._buffers)),
                None,
            )
            if module is None:
                raise ValueError(f"comprehension.pretrained: {name} has no place in the model built from the config")
            is_parameter = leaf in module._parameters
            own = module._parameters[leaf] if is_parameter else module._buffers[leaf]
            if own is not None and own.shape != tensor.shape:
                raise ValueError(f"comprehension.pretrained: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model built from the config {tuple(own.shape)}")
            if is_parameter:
                if id(tensor) not in taken:
                    taken[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=False)
                module._parameters[leaf] = taken[id(tensor)]
            else:
                module._buffers[leaf] = tensor
        left = [name for name, p in self.base_model.named_parameters()
                if p.is_meta and "lora_" not in name and not name.endswith("new_rows")]
        if left:
            raise ValueError(f"comprehension.pretrained: {self.pretrained} lacks {len(left)} weights, e.g. {left[:3]}")

    def _restart_new_weights(self) -> None:
        """The [MM] rows from the loaded rows' mean; LoRA matrices still on ``meta`` initialised as peft does."""
        from peft.tuners.lora import LoraLayer

        embedding, head = self.input_rows, self.output_rows
        tied = head.new_rows is embedding.new_rows
        old = min(embedding.first_id, embedding.base.num_embeddings)
        embedding.new_rows = nn.Parameter(mean_row(embedding.base.weight, old, embedding.num_new))
        if tied:
            head.new_rows = embedding.new_rows
        else:
            weight = cast(torch.Tensor, head.base.weight)
            rows = mean_row(weight, min(head.first_id, int(weight.shape[0])), head.num_new)
            head.new_rows = nn.Parameter(rows)
        init = self.llava.peft_config["default"].init_lora_weights if isinstance(self.llava, PeftModel) else True
        for module in self.llava.modules():
            if not isinstance(module, LoraLayer):
                continue
            device = module.get_base_layer().weight.device
            for adapter in list(module.lora_A):
                if module.lora_A[adapter].weight.is_meta:
                    module.lora_A[adapter].to_empty(device=device)
                    module.lora_B[adapter].to_empty(device=device)
                    with torch.enable_grad():
                        module.reset_lora_parameters(adapter, init)

    @property
    def base_model(self) -> LlavaForConditionalGeneration:
        """The LLaVA model itself (LoRA layers live inside it)."""
        model = self.llava.get_base_model() if isinstance(self.llava, PeftModel) else self.llava
        return cast(LlavaForConditionalGeneration, model)

    @property
    def input_rows(self) -> NewRowsEmbedding:
        """The input embedding with the [MM] rows."""
        return cast(NewRowsEmbedding, self.base_model.get_input_embeddings())

    @property
    def output_rows(self) -> NewRowsHead:
        """The output head with the [MM] rows."""
        return cast(NewRowsHead, self.base_model.get_output_embeddings())

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters that train: ``{"lora": LoRA A/B matrices, "mm_embeddings": new [MM] rows}``."""
        lora = [p for name, p in self.llava.named_parameters() if "lora_" in name]  # whatever requires_grad says
        rows = [self.input_rows.new_rows]
        if self.output_rows.new_rows is not self.input_rows.new_rows:
            rows.append(self.output_rows.new_rows)
        return {"lora": lora, "mm_embeddings": rows}

    def encode(
        self,
        instructions: list[str],
        device: torch.device | str | None = None,
        answers: list[str] | None = None,
    ) -> EncodedPrompts:
        """Tokenise instructions into prompts answered by the [MM] tokens (after ``answers``, if given)."""
        return self._prompts()(instructions, device, answers)

    def _prompts(self) -> PromptEncoder:
        if self.prompts is None:
            raise RuntimeError("this comprehension model has no tokenizer (a meta build): load real weights")
        return self.prompts

    def forward(
        self,
        pixel_values: torch.Tensor,
        instructions: list[str],
        compute_loss: bool = True,
        answers: list[str] | None = None,
        return_mm_rows: bool = False,
    ) -> ComprehensionOutput:
        """Read ``h`` (B, r, d_llm), patch features (B, P, d_vision) and ``L_LLM`` for CLIP-normalised images.

        ``answers``: a text per row teacher-forced before the [MM] tokens; ``L_LLM`` is then the NLL of
        its tokens and the [MM] tokens (else of the [MM] tokens alone). ``return_mm_rows``: also give the
        [MM] rows of the input embedding, as the embedding's own forward gave them at the [MM] positions (so
        that a caller may use them and train them where the parameter itself is not whole outside that
        forward: sharded under FSDP, or a ``meta`` tensor under sequential offload, whose hooks bring the
        weights only while the module runs).
        """
        if len(instructions) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(instructions)} instructions")
        batch = self.encode(list(instructions), pixel_values.device, None if answers is None else list(answers))
        model = self.base_model
        vision_dtype = model.model.vision_tower.get_input_embeddings().weight.dtype
        embedded: list[torch.Tensor] = []  # the input embedding's output, when the [MM] rows are asked for
        handle = (
            self.input_rows.register_forward_hook(lambda module, args, output: embedded.append(output))
            if return_mm_rows
            else None
        )
        try:
            out = model.model(
                input_ids=batch.input_ids,
                pixel_values=pixel_values.to(vision_dtype),  # (B, 3, H, W)
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                vision_feature_layer=self.vision_feature_layer,
            )
        finally:
            if handle is not None:
                handle.remove()
        hidden = out.last_hidden_state  # (B, L, d_llm), after the final norm
        size = (pixel_values.shape[0], self.num_mm_tokens, self.hidden_size)
        h = hidden[batch.mm_mask].view(size)  # (B, r, d_llm)
        patches = out.image_outputs.hidden_states[self.vision_feature_layer][:, 1:]  # (B, P, d_vision)
        loss = None
        if compute_loss:
            predicts = batch.labels[:, 1:] != IGNORE_INDEX  # (B, L-1): the next token is labelled (answer, [MM])
            logits = self.output_rows(hidden[:, :-1][predicts])  # (N, V')
            loss = F.cross_entropy(logits.float(), batch.labels[:, 1:][predicts])
        rows = None
        if return_mm_rows:  # the [MM] positions of what the embedding gave: its new rows, taken while they were live
            rows = embedded[0][batch.mm_mask].view(size)  # (B, r, d_llm)
        return ComprehensionOutput(h=h, vision_features=patches, loss_llm=loss, mm_rows=rows)

    @torch.no_grad()
    def generate_answers(
        self, pixel_values: torch.Tensor, instructions: list[str], max_new_tokens: int = 32
    ) -> list[str]:
        """Greedily write each row's answer to (image, instruction), up to its first [MM] token or EOS.

        Deterministic (argmax, no sampling, in eval mode whatever the model's mode: no LoRA dropout, and
        the key-value cache that gradient checkpointing turns off in training); at most
        ``max_new_tokens`` tokens a row (``0``: empty answers). The text returned is what
        :meth:`forward` takes as ``answers``.
        """
        if len(instructions) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(instructions)} instructions")
        if max_new_tokens <= 0:
            return [""] * len(instructions)
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            return self._greedy(pixel_values, instructions, max_new_tokens)
        finally:
            for module, training in modes.items():
                module.train(training)

    def _greedy(self, pixel_values: torch.Tensor, instructions: list[str], max_new_tokens: int) -> list[str]:
        """:meth:`generate_answers` in eval mode."""
        prompts = self._prompts()
        batch = prompts.heads(list(instructions), pixel_values.device)
        model = self.base_model
        vision_dtype = model.model.vision_tower.get_input_embeddings().weight.dtype
        stop = torch.tensor([*prompts.mm_token_ids, self.eos_token_id], device=pixel_values.device)
        tokenizer = prompts.tokenizer
        banned = [prompts.image_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]  # never part of a text
        banned_ids = torch.tensor([i for i in banned if i is not None and i != self.eos_token_id])
        mask, positions = batch.attention_mask, batch.position_ids
        out = model.model(
            input_ids=batch.input_ids,
            pixel_values=pixel_values.to(vision_dtype),
            attention_mask=mask,
            position_ids=positions,
            vision_feature_layer=self.vision_feature_layer,
            use_cache=True,
        )
        done = torch.zeros(len(instructions), dtype=torch.bool, device=pixel_values.device)
        written: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.output_rows(out.last_hidden_state[:, -1]).float()  # (B, V')
            logits[:, banned_ids.to(logits.device)] = -torch.inf
            token = logits.argmax(dim=-1)  # (B,)
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            written.append(torch.where(done, stop[-1], token))
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            positions = positions[:, -1:] + 1
            out = model.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                cache=out.cache,
                use_cache=True,
            )
        if not written:
            return [""] * len(instructions)
        ids = torch.stack(written, dim=1).tolist()  # (B, T)
        texts = []
        for row in ids:
            kept = row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row
            text = tokenizer.decode(kept, skip_special_tokens=True)
            for reserved in (IMAGE_TOKEN, *self.mm_tokens):  # pieces that spell one would read as that token
                text = text.replace(reserved, " ")
            texts.append(" ".join(text.split()))
        return texts

    @property
    def eos_token_id(self) -> int:
        """The id that ends a generated answer (besides the [MM] tokens)."""
        tokenizer = self._prompts().tokenizer
        return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id)

    def _rows_metadata(self) -> dict[str, str]:
        """What a saved set of [MM] rows must match to be loaded."""
        return {
            "mm_tokens": json.dumps(self.mm_tokens),
            "first_mm_id": str(self.first_mm_id),
            "hidden_size": str(self.hidden_size),
        }

    def save_trainable(self, directory: str | Path) -> Path:
        """Write the LoRA adapter (peft format) and the [MM] rows (safetensors); never the frozen base."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.llava, PeftModel):
            self.llava.save_pretrained(str(directory), save_embedding_layers=False)
        rows = {"input": self.input_rows.new_rows.detach().cpu().contiguous()}
        if self.output_rows.new_rows is not self.input_rows.new_rows:
            rows["output"] = self.output_rows.new_rows.detach().cpu().contiguous()
        save_file(rows, str(directory / MM_ROWS_FILE), metadata=self._rows_metadata())
        return directory

    @torch.no_grad()
    def load_trainable(self, directory: str | Path) -> None:
        """Load what :meth:`save_trainable` wrote into this model (same r, [MM] ids, widths and LoRA)."""
        directory = Path(directory)
        path = directory / MM_ROWS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {MM_ROWS_FILE} in {directory}")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata != self._rows_metadata():
            raise ValueError(f"{path} was saved for another [MM] setup: {metadata} vs {self._rows_metadata()}")
        rows = load_file(str(path))
        self.input_rows.new_rows.copy_(rows["input"])
        if self.output_rows.new_rows is not self.input_rows.new_rows:
            self.output_rows.new_rows.copy_(rows["output"])
        has_adapter, has_lora = (directory / ADAPTER_CONFIG_FILE).is_file(), isinstance(self.llava, PeftModel)
        if has_adapter != has_lora:
            raise ValueError(f"LoRA mismatch: adapter saved: {has_adapter}, model has LoRA: {has_lora}")
        if has_adapter:
            result: Any = set_peft_model_state_dict(self.llava, load_peft_weights(str(directory)))
            if result.unexpected_keys:
                raise ValueError(f"unexpected LoRA weights in {directory}: {result.unexpected_keys[:5]}")
            missing = [key for key in result.missing_keys if "lora_" in key]
            if missing:
                raise ValueError(f"LoRA weights missing from {directory}: {missing[:5]}")
