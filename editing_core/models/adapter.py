"""ModelAdapter: the roles of one loaded model, answered from the architecture table.

Editors and scorers name roles and layer indices ("mlp_out", layer 10); the adapter turns them
into modules, parameters and parameter names, and hides GPT-2's transposed Conv1D weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .architectures import ROLES, Architecture, architecture_for


@dataclass(frozen=True)
class ModelAdapter:
    model: nn.Module
    arch: Architecture
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    context_length: int | None

    @classmethod
    def for_model(cls, model: nn.Module) -> "ModelAdapter":
        config = model.config
        arch = architecture_for(config.model_type)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, arch.kv_heads_attr, None) if arch.kv_heads_attr else None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            model=model,
            arch=arch,
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads or num_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            context_length=getattr(config, "max_position_embeddings", None),
        )

    # -- paths -------------------------------------------------------------------------
    @property
    def _prefix(self) -> str:
        """Dotted path from the full model to its base model ("" when they are the same)."""
        base = self.model.base_model
        if base is self.model:
            return ""
        for name, module in self.model.named_children():
            if module is base:
                return name + "."
        raise ValueError("cannot locate the base model inside the model")  # never for HF models

    def module_path(self, role: str, layer: int) -> str:
        """Full dotted module path of `role` in `layer` ("model.layers.3.mlp.down_proj")."""
        layer = self.resolve_layers([layer])[0]
        block = f"{self._prefix}{self.arch.blocks}.{layer}"
        if role == "block":
            return block
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: block, {', '.join(ROLES)}")
        return f"{block}.{getattr(self.arch, role)}"

    def module(self, role: str, layer: int) -> nn.Module:
        return self.model.get_submodule(self.module_path(role, layer))

    def param_name(self, role: str, layer: int) -> str:
        """Full name of the role's weight parameter, as in `model.named_parameters()`."""
        return self.module_path(role, layer) + ".weight"

    def weight(self, role: str, layer: int) -> nn.Parameter:
        return self.module(role, layer).weight

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(f"{self._prefix}{self.arch.blocks}")

    def final_modules(self) -> list[nn.Module]:
        """The modules between the last block and the LM head, in order (final norm, ...)."""
        modules = []
        for path in self.arch.final:
            module: nn.Module | None = self.model.base_model
            for part in path.split("."):
                module = getattr(module, part, None)
            if module is not None:
                modules.append(module)
        return modules

    # -- layers ------------------------------------------------------------------------
    def resolve_layers(self, layers: Iterable[int]) -> list[int]:
        """Non-negative layer indices; negative ones count from the end (-1 = last layer)."""
        resolved = []
        for layer in layers:
            index = layer + self.num_layers if layer < 0 else layer
            if not 0 <= index < self.num_layers:
                raise ValueError(
                    f"layer {layer} is out of range: this {self.model_type} model has "
                    f"{self.num_layers} layers (0..{self.num_layers - 1}, or -1..-{self.num_layers})"
                )
            resolved.append(index)
        return resolved

    def param_names(self, roles: Sequence[str], layers: Sequence[int]) -> list[str]:
        return [self.param_name(role, layer) for layer in self.resolve_layers(layers) for role in roles]

    # -- weight orientation ------------------------------------------------------------
    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight (or its delta) viewed as (out_features, in_features), whatever its storage."""
        return weight.T if self.arch.conv1d else weight

    def from_out_in(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of `as_out_in`: back to the parameter's storage orientation."""
        return matrix.T if self.arch.conv1d else matrix
