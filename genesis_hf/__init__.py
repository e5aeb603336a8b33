"""Genesis: the Genesis 1B model for Hugging Face transformers.

`import genesis_hf` registers the "genesis" model type with `AutoConfig`,
`AutoModel`, `AutoModelForCausalLM` and the sequence-classification, token-classification
and question-answering Auto classes, and marks every class for
`register_for_auto_class`, so `save_pretrained` writes `auto_map` and copies
this package's configuration and modeling files next to the weights: the saved
folder then loads with `trust_remote_code=True` where genesis_hf is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_genesis import GenesisConfig
from .modeling_genesis import (
    GenesisForCausalLM,
    GenesisForQuestionAnswering,
    GenesisForSequenceClassification,
    GenesisForTokenClassification,
    GenesisModel,
    GenesisPreTrainedModel,
    causal_lm_loss,
)

AutoConfig.register(GenesisConfig.model_type, GenesisConfig, exist_ok=True)
GenesisConfig.register_for_auto_class("AutoConfig")
for _auto, _model in (
    (AutoModel, GenesisModel),
    (AutoModelForCausalLM, GenesisForCausalLM),
    (AutoModelForSequenceClassification, GenesisForSequenceClassification),
    (AutoModelForTokenClassification, GenesisForTokenClassification),
    (AutoModelForQuestionAnswering, GenesisForQuestionAnswering),
):
    _auto.register(GenesisConfig, _model, exist_ok=True)
    _model.register_for_auto_class(_auto.__name__)

__version__ = "0.1.0"
__all__ = [
    "GenesisConfig",
    "GenesisForCausalLM",
    "GenesisForQuestionAnswering",
    "GenesisForSequenceClassification",
    "GenesisForTokenClassification",
    "GenesisModel",
    "GenesisPreTrainedModel",
    "causal_lm_loss",
]
