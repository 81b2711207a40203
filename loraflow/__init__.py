"""loraflow: LoRA-Flow (Wang et al., ACL 2024) as a library.

k frozen LoRA modules on one frozen Hugging Face causal LM, fused per token by one tiny gate per decoder layer:
`w_l = softmax(W_l x / T) + b_l`, where x is the layer's input hidden state; the same w_l weights the LoRA outputs
of every targeted projection of layer l.
"""

from .errors import LoraflowError

__version__ = "0.1.0"

__all__ = ["LoraflowError", "__version__"]
