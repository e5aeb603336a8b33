"""Genesis: the Genesis 1B model for Hugging Face transformers.

`import genesis_hf` registers the "genesis" model type with `AutoConfig`,
`AutoModel` and `AutoModelForCausalLM`, and marks both classes for
`register_for_auto_class`, so `save_pretrained` writes `auto_map` and copies
this package's configuration and modeling files next to the weights: the saved
folder then loads with `trust_remote_code=True` where genesis_hf is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_genesis import GenesisConfig
from .modeling_genesis import GenesisForCausalLM, GenesisModel, GenesisPreTrainedModel, causal_lm_loss

AutoConfig.register(GenesisConfig.model_type, GenesisConfig, exist_ok=True)
AutoModel.register(GenesisConfig, GenesisModel, exist_ok=True)
AutoModelForCausalLM.register(GenesisConfig, GenesisForCausalLM, exist_ok=True)
GenesisConfig.register_for_auto_class("AutoConfig")
GenesisModel.register_for_auto_class("AutoModel")
GenesisForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "GenesisConfig",
    "GenesisForCausalLM",
    "GenesisModel",
    "GenesisPreTrainedModel",
    "causal_lm_loss",
]
