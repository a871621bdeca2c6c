"""DistillationStudent: base + LoRA (layers 1..L-1) learns, without the persona, what the base does with it."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng

from prism_lightning.distributed import rng_state
from prism_lightning.distributed.collectives import all_gather_objects, local_tensor, zero3_partitioned
from prism_lightning.model.activation_checkpointing import is_checkpointing, set_checkpointing
from prism_lightning.model.adapters import DEFAULT_ADAPTER, check_adapters
from prism_lightning.model.backbone import Backbone, BackboneConfig, check_base_model, load_backbone
from prism_lightning.model.lm_head import decoder_hidden, head_logits
from prism_lightning.model.lora import LoraSettings, attach_lora
from prism_lightning.model.prefix_states import PrefixStates
from prism_lightning.model.row_routing import rows_on_adapters
from prism_lightning.training.divergence import check_gradient_norm, check_gradients, check_metric, check_weights
from prism_lightning.training.modules.distill_loss import DistillLoss, loss_tokens
from prism_lightning.training.modules.teacher_pass import TeacherPass
from prism_lightning.training.optim import adamw, with_schedule
from prism_lightning.utils.checks import check_distillation
from prism_lightning.utils.errors import PrismError


def as_dataclass(cls: type, value: Any) -> Any:
    """Accept a dataclass or its mapping form (as hyperparameters and some config paths hand it over)."""
    if isinstance(value, cls):
        return value
    mapping = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    return cls(**mapping)



class DistillationStudent(TeacherPass, DistillLoss, L.LightningModule):
    """Context distillation of the persona into one LoRA adapter.

    Teacher = the same weights with the adapter disabled, given the persona, no grad, eval mode.
    Student = base + LoRA, no persona. Loss = top-k KL at temperature T (× T²) on the identical response tokens,
    on distill items; plus ``retain_weight`` × KL(base ‖ student) on retain items (0 = paper).

    Args:
        backbone: base model (linked from ``data.backbone``).
        lora: LoRA settings.
        temperature: distillation temperature.
        top_k: teacher support size for the KL; 0 = full vocabulary.
        retain_weight: weight of the retain term.
        lr: AdamW learning rate of the LoRA parameters.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of steps with linear warmup.
        divergence_limit: stop training when the gradient norm or a trainable weight's magnitude exceeds this.
        gradient_checkpointing: recompute each decoder layer's activations in backward instead of keeping them
            (transformers' non-reentrant checkpointing): activation memory of one layer instead of all, for about
            one more forward of compute. Off by default; on in the 7-8B configs.
        head_chunk: response tokens whose vocabulary-wide logits exist at once in the loss (the LM head runs on
            chunks of this many tokens and is recomputed in backward when there are several).
        prefix_reuse: the online teacher computes the keys and values of each persona block once per process and
            runs only the tokens after it in each step (same targets; off under multi-rank ZeRO-3, whose every
            forward is a collective, and for sliding-window models).
        adapters: the LoRA adapters (linked from ``data.adapters``; one ``default`` adapter when empty): each distill
            row trains its own context's adapter.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), lora: LoraSettings = LoraSettings(),
                 temperature: float = 2.0, top_k: int = 64, retain_weight: float = 0.0, lr: float = 2e-4,
                 weight_decay: float = 0.01, warmup_ratio: float = 0.1, divergence_limit: float = 1e4,
                 gradient_checkpointing: bool = False, head_chunk: int = 1024, prefix_reuse: bool = True,
                 adapters: Sequence[str] = ()) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone_config = as_dataclass(BackboneConfig, backbone)
        self.lora = as_dataclass(LoraSettings, lora)
        check_distillation(self.hparams, self.lora)
        self.adapter_names: list[str] = list(adapters) or [DEFAULT_ADAPTER]
        self.model: Optional[Any] = None
        self.prefix_states = PrefixStates()  # the frozen teacher's persona-block keys/values
        self.strict_loading = False  # checkpoints hold only trainable weights, never the frozen base
        # Held-out KL(teacher ‖ student) before the first step: what distillation starts from (kept in checkpoints).
        self.kl_at_init: Optional[float] = None

    @property
    def backbone(self) -> Backbone:
        """The process-wide backbone these weights come from."""
        return load_backbone(self.backbone_config)

    def configure_model(self) -> None:
        """Load the backbone (once per process) and attach LoRA."""
        if self.model is None:
            if len(self.adapter_names) > 1 and self.hparams.gradient_checkpointing:
                # The per-row adapter factors live for the forward only; a checkpointed recompute in backward
                # would run every adapter on every row.
                raise PrismError("model.init_args.gradient_checkpointing: not supported with several adapters "
                                 "(data.adapters) yet; turn it off or train one adapter")
            self.model = attach_lora(self.backbone, self.lora, self.adapter_names)
            self.model.train()  # the backbone was loaded in eval mode; LoRA dropout must be live in training
        base = self.model.get_base_model()
        # The backbone is shared by the process: turning it off undoes another module's setting.
        if bool(self.hparams.gradient_checkpointing) != is_checkpointing(base):
            set_checkpointing(base, bool(self.hparams.gradient_checkpointing))

    def setup(self, stage: str) -> None:
        """Build the model here, before Lightning calls ``configure_model`` inside DeepSpeed's ``zero.Init``.

        Under ZeRO-3 that context partitions each parameter as it is created, so PEFT's initialisation (LoRA B = 0)
        and the backbone's loaded weights would land on empty placeholders; built here, DeepSpeed partitions the
        finished weights when it wraps the module.
        """
        self.configure_model()

    def decoder_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, H] of base + LoRA; the LM head is applied later, only where a loss reads."""
        return decoder_hidden(self.model, input_ids, attention_mask)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (with the model's final logit scaling) on hidden states [..., H]."""
        return head_logits(self.model, hidden)

    def student_hidden(self, batch: dict) -> torch.Tensor:
        """Hidden states of base + LoRA on the persona-free inputs, each row through its own adapter."""
        with rows_on_adapters(self.model, self.student_routes(batch), self.adapter_names) as routed:
            if routed:
                raise PrismError("K-way training needs plain LoRA adapters (a LoRA variant such as DoRA cannot be "
                                 "routed per row in training)")
            return self.decoder_hidden(batch["student_ids"], batch["student_mask"])

    def student_routes(self, batch: dict) -> list[str]:
        """The adapter each row trains: a distill row its context's (``route`` k ≥ 1 → adapter k); a retain row,
        which only a retain term reads, takes the adapters in turn."""
        names, k = self.adapter_names, len(self.adapter_names)
        if k == 1:
            return [names[0]] * len(batch["ids"])
        routes = batch["route"].tolist()
        return [names[r - 1] if r > 0 else names[b % k] for b, r in enumerate(routes)]

    def check_finite(self, loss: torch.Tensor, batch: dict, batch_idx: int) -> None:
        """Stop with the step and batch named when the loss is NaN or inf."""
        if not torch.isfinite(loss).all():
            raise PrismError(f"non-finite loss ({loss.item()}) at global step {self.global_step}, batch {batch_idx} "
                             f"(items {', '.join(batch['ids'][:4])}); lower the learning rate or check the data")

    def check_validation(self, out: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Stop ``validate`` (and fit) when a held-out loss is non-finite: a diverged adapter never passes silently."""
        for name, value in out.items():
            check_metric(f"val/{name}", float(value), f"validation batch {batch_idx}")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop when the gradients explode (fp16's GradScaler handles its own overflows).

        DeepSpeed keeps gradients in its own buffers (``p.grad`` is None); its global norm is checked after the step.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is None and self.deepspeed_engine() is None:
            check_gradients([p for p in self.parameters() if p.requires_grad], self.global_step,
                            self.hparams.divergence_limit)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop when the gradients or a trainable weight become non-finite or explode, before a checkpoint."""
        limit = self.hparams.divergence_limit
        engine = self.deepspeed_engine()
        # The same value on every rank; under fp16 DeepSpeed's loss scaler skips overflowing steps by itself.
        if engine is not None and not engine.fp16_enabled() and engine.get_global_grad_norm() is not None:
            check_gradient_norm(float(engine.get_global_grad_norm()), self.global_step, limit)
        named = [(n, local_tensor(p)) for n, p in self.named_parameters() if p.requires_grad]
        if not zero3_partitioned(self):
            check_weights(named, self.global_step, limit)
            return
        # ZeRO-3: each rank sees only its shard, and all ranks must stop together (a lone stop hangs the others).
        try:
            check_weights(named, self.global_step, limit)
            problem = None
        except PrismError as exc:
            problem = str(exc)
        found = [p for p in all_gather_objects(problem) if p]
        if found:
            raise PrismError(found[0])

    def deepspeed_engine(self) -> Optional[Any]:
        """The DeepSpeed engine training this module, if any."""
        trainer = self._trainer
        return getattr(trainer.strategy, "deepspeed_engine", None) if trainer is not None else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One distillation step."""
        out = self.distill_loss(batch, self.student_hidden(batch))
        self.check_finite(out["loss"], batch, batch_idx)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=len(batch["ids"]))
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out KL."""
        out = self.distill_loss(batch, self.student_hidden(batch))
        self.check_validation(out, batch_idx)
        self.log_validation(out, batch)

    def log_validation(self, out: dict[str, torch.Tensor], batch: dict, sync_dist: bool = False) -> None:
        """Log held-out losses: each KL term as a mean per loss token over the split (a batch weighs by its loss
        tokens, so batches without distill rows do not pull it toward 0), the others per row."""
        weights = loss_tokens(batch)
        for key, value in out.items():
            self.log(f"val/{key}", value, batch_size=weights.get(key, len(batch["ids"])), sync_dist=sync_dist)

    def on_train_start(self) -> None:
        """Measure the held-out KL before the first step (``val/kl_init``); a resumed fit keeps the stored one."""
        if self.kl_at_init is not None or self.trainer.datamodule is None or not self.trainer.limit_val_batches:
            return
        with isolate_rng():  # the measurement must not shift the training's random draws
            self.kl_at_init = self.held_out_kl()
        for logger in self.loggers:
            logger.log_metrics({"val/kl_init": self.kl_at_init}, step=0)

    @torch.no_grad()
    def held_out_kl(self) -> float:
        """The held-out KL as a validation pass measures ``val/kl``: the mean per distill token of this rank's
        share, averaged over ranks. Eval mode, no grad, the trainer's precision; every rank runs every
        batch of its share (under ZeRO-3 each forward is a collective)."""
        loader = self.trainer.datamodule.val_dataloader()
        limit = self.trainer.limit_val_batches
        batches = len(loader) if isinstance(limit, float) and limit >= 1.0 else (
            math.ceil(limit * len(loader)) if isinstance(limit, float) else min(int(limit), len(loader)))
        was_training = self.model.training
        self.model.eval()
        total, weight = 0.0, 0
        try:
            with self.trainer.precision_plugin.val_step_context():
                for index, batch in enumerate(loader):
                    if index >= batches:
                        break
                    batch = self.trainer.strategy.batch_to_device(batch)
                    kl = self.distill_loss(batch, self.student_hidden(batch))["kl"]
                    tokens = loss_tokens(batch)["kl"]
                    total, weight = total + float(kl) * tokens, weight + tokens
        finally:
            self.model.train(was_training)
        means = [t / w for t, w in all_gather_objects((total, weight)) if w]
        return sum(means) / len(means) if means else float("nan")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict:
        """AdamW with linear warmup and decay."""
        optimizer = adamw(self.trainable_parameters(), self.hparams.lr, self.hparams.weight_decay, self._trainer)
        return with_schedule(optimizer, self.trainer.estimated_stepping_batches, self.hparams.warmup_ratio)

    # Checkpoints keep the trainable weights and the base model's reference, never the frozen base.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop frozen weights from the checkpoint and record which base model it belongs to."""
        keep = trainable_state_keys(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["prism_base_model"] = self.backbone.reference
        checkpoint["prism_rng"] = rng_state.capture_all_ranks()
        checkpoint["prism_kl_at_init"] = self.kl_at_init
        checkpoint["prism_adapters"] = self.adapter_names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint made for another base model; restore the random state saved with it."""
        check_base_model(checkpoint.get("prism_base_model"), self.backbone, "checkpoint")
        check_adapters(checkpoint.get("prism_adapters", [DEFAULT_ADAPTER]), self.adapter_names, "the checkpoint")
        check_shapes(checkpoint.get("state_dict", {}), self.state_dict(), checkpoint.get("hyper_parameters", {}))
        self.kl_at_init = checkpoint.get("prism_kl_at_init", self.kl_at_init)
        trainer = self._trainer  # None when `prism export` loads a checkpoint outside any loop
        if trainer is not None and trainer.state.fn == "fit":
            problem = rng_state.restore(checkpoint.get("prism_rng"), trainer.global_rank, trainer.world_size)
            if problem:
                rank_zero_warn(problem)


def trainable_state_keys(module: torch.nn.Module) -> set[str]:
    """State-dict keys of trainable parameters and of small buffers outside the frozen base (gate temperature)."""
    keys = {name for name, p in module.named_parameters() if p.requires_grad}
    keys |= {name for name, _ in module.named_buffers() if ".base_model." not in f".{name}"}
    return keys


def check_shapes(saved: dict, current: dict, saved_hparams: dict) -> None:
    """Refuse a checkpoint whose trainable weights have other shapes than this module's (another LoRA rank or gate
    width), saying which settings differ, instead of Lightning's state-dict size-mismatch dump."""
    for key, value in saved.items():
        if key in current and tuple(value.shape) != tuple(current[key].shape):
            lora = saved_hparams.get("lora")
            rank = getattr(lora, "rank", None) if not isinstance(lora, dict) else lora.get("rank")
            if "lora_" in key and rank is not None:
                what = f"LoRA rank {rank}; this config has rank {current[key].shape[0 if 'lora_A' in key else 1]}"
                hint = f"set model.init_args.lora.rank {rank}"
            else:
                what = f"{key} of shape {list(value.shape)}; this model's is {list(current[key].shape)}"
                hint = "use the settings it was trained with (gate_dims, lora)"
            raise PrismError(f"the checkpoint was trained with {what}: {hint}, or start a new run in another "
                             f"trainer.default_root_dir")
