"""The fusion core: `FusionGate` (gate), `FusedLoRALinear` (layers), `FlowModel` and `inject_fusion` (model), PEFT
LoRA reading (adapters) and gate files (checkpoints). It imports nothing from training, evaluation or commands."""
