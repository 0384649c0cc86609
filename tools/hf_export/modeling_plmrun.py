"""Hugging Face wrapper around plmrun's model.py (copied beside this file by `python -m tools.hf export`).

The model reads one flat buffer of packed documents; this wrapper packs the rows of a usual [batch, length] input
(the tokens its attention_mask keeps) into that buffer, one document per row, and returns logits [batch, length,
vocab] (zeros where the mask is 0).
"""
import dataclasses

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .model import BLOCK, Model, ModelConfig, rotary_tables

FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class PlmrunConfig(PretrainedConfig):
    model_type = "plmrun"

    def __init__(self, **kwargs):
        for name in FIELDS:  # ModelConfig's fields, stored flat in config.json
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in FIELDS})


class PlmrunForMaskedLM(PreTrainedModel):
    config_class = PlmrunConfig
    base_model_prefix = "model"

    def __init__(self, config: PlmrunConfig):
        super().__init__(config)
        self.model = Model(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        # from_pretrained builds the model without data; the rotary tables are not in the weights file
        if isinstance(module, Model):
            module.rope_cos, module.rope_sin = (t.to(module.rope_cos.device) for t in rotary_tables(module.cfg))

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = keep.sum(1)
        if lengths.max() > self.config.max_len:
            raise ValueError(f"a sequence of {int(lengths.max())} tokens is longer than this model's max_len "
                             f"({self.config.max_len}); crop it")
        tokens = input_ids[keep]
        n, rows = tokens.numel(), len(input_ids)
        T = max(BLOCK, -(-n // BLOCK) * BLOCK)
        # the tail of padding: each <pad> a document of its own, as in training
        buffer = F.pad(tokens, (0, T - n), value=self.config.pad_token_id)
        doc_ids = torch.cat([torch.repeat_interleave(torch.arange(rows, device=tokens.device), lengths),
                             torch.arange(rows, rows + T - n, device=tokens.device)]).int()
        window = torch.tensor(self.config.max_len, device=tokens.device)
        flat = self.model(buffer, doc_ids, torch.arange(n, device=tokens.device), None, window)
        logits = flat.new_zeros(*input_ids.shape, flat.size(-1))
        logits[keep] = flat
        loss = None if labels is None else F.cross_entropy(logits[keep], labels[keep], ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
