"""From Hugging Face models and peft adapters to the IR.

``lower`` (:mod:`.lower`) turns any ``nn.Module`` with the causal-LM forward into a
:class:`~lorashear.ir.core.Module` through ``torch.export`` (also on the ``meta`` device) and
recognises peft's LoRA pattern; :mod:`.pretrained` lowers a local model directory (with an
adapter, or fresh LoRA factors) so that weights stay handles into the source safetensors.
Imports only :mod:`lorashear.ir` (and the shared errors).
"""
