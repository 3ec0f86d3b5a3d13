"""HF-transformers wrappers, registered with AutoConfig / AutoModelForCausalLM as model_type "tnl".

    import tnl.hf  # needs `pip install transformers`; tnl itself does not
    model = AutoModelForCausalLM.from_config(tnl.hf.TNLHFConfig(**TNLConfig.preset("tiny").to_dict()))
    model.save_pretrained("out"); AutoModelForCausalLM.from_pretrained("out")

The wrapped tnl.TNLForCausalLM sits in .model, so weights are named "model.<tnl name>". Use
model.model.generate(...) for tnl's constant-memory recurrent decoding; transformers' own
generate() is not wired to the recurrent cache.
"""
from __future__ import annotations

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("tnl.hf needs transformers (pip install transformers); tnl itself works without it") from e

import dataclasses

import torch
import torch.nn.functional as F

from .config import TNLConfig
from .layers import GLA, decay_slopes
from .model import TNLForCausalLM

_FIELDS = [f.name for f in dataclasses.fields(TNLConfig)]


class TNLHFConfig(PretrainedConfig):
    model_type = "tnl"

    def __init__(self, **kwargs):
        defaults = TNLConfig().to_dict()
        tnl_values = {name: kwargs.pop(name, defaults[name]) for name in _FIELDS}
        TNLConfig(**tnl_values)  # validate now, with TNLConfig's messages
        for name, value in tnl_values.items():
            setattr(self, name, value)
        kwargs.setdefault("tie_word_embeddings", tnl_values["tie_word_embeddings"])
        super().__init__(**kwargs)

    def to_tnl(self) -> TNLConfig:
        return TNLConfig(**{name: getattr(self, name) for name in _FIELDS})


class TNLHFForCausalLM(PreTrainedModel):
    config_class = TNLHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["TNLBlock"]
    # transformers 5 maps tied target -> source; 4 lists the targets (used when tie_word_embeddings)
    if int(transformers.__version__.split(".")[0]) >= 5:
        _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["model.lm_head.weight"]

    def __init__(self, config: TNLHFConfig):
        super().__init__(config)
        self.model = TNLForCausalLM(config.to_tnl())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # TNLForCausalLM initialises its weights; but from_pretrained builds the model on the meta
        # device, and the decay slopes (a buffer not saved with the weights) must be rebuilt
        if isinstance(module, GLA):
            module.slopes.copy_(decay_slopes(self.model.config, module.layer))

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids, labels=None, return_dict=None, **kwargs):
        """labels as in transformers: the same positions as input_ids (shifted here), -100 ignored."""
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register("tnl", TNLHFConfig, exist_ok=True)
AutoModelForCausalLM.register(TNLHFConfig, TNLHFForCausalLM, exist_ok=True)
