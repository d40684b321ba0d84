"""Qwen3 dense and Qwen3-MoE on megatron-core: model building, HF <-> mcore weights, data, checkpoints.

- `dims`: the architecture numbers read from a Hugging Face `config.json` (no torch; the login
  node's spec checks use it).
- `model`: `TransformerConfig` + layer specs + `GPTModel` (TransformerEngine's spec when it is
  installed, else megatron-core's local spec with the two modules of `modules`).
- `modules`: an expert module on `torch.nn.functional.grouped_mm`, a core attention on SDPA / torch's
  varlen flash kernel (packed sequences) and an RMSNorm that allows sequence parallelism, plugged in
  through `ModuleSpec`; `model.patch_megatron_core` works around a 0.16.1 bug without TE.
- `convert`: HF safetensors -> the parameters of a (tensor/expert/pipeline-parallel) model, and
  back (`export_hf_state_dict`), for the two architectures.
- `data`: SFT rows (the shared tokenization/packing cache) -> Megatron micro-batches.
- `checkpoint`: `iter_<n>` folders written with `dist_checkpointing`, the completion marker,
  resume and the model-only load that `hpcqwen export --to-hf` uses.

Everything but `dims` and `data` imports megatron-core (`pip install 'hpcqwen[megatron]'`).
"""
