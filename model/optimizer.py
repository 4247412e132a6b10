"""The optimizer of a run: AdamW for every trainable parameter, or Muon (model/muon.py) for the
blocks' weight matrices and AdamW for the rest."""

import torch


def make_optimizer(model, device_type, optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99),
                   muon_momentum=0.95):
    """The optimizer for `model`'s trainable parameters. The learning rate set here is only the
    start: train.py sets every group's rate at every step from its schedule."""
    # only what trains: a LoRA run's frozen base needs no optimizer state
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon_matrices = []
    if optimizer == "muon":
        # LoRA's adapters stay with AdamW: Muon orthogonalises the update of a whole weight matrix,
        # and an adapter's thin A and B are not one
        muon_matrices = [p for name, p in named if name.startswith("blocks.") and p.dim() == 2 and ".lora_" not in name]
    adamw = [p for _, p in named if not any(p is q for q in muon_matrices)]
    # Weight decay pulls matrices towards zero; doing that to biases, norms' gains or
    # 1-D parameters only hurts, so they get none.
    groups = [{"params": [p for p in adamw if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in adamw if p.dim() < 2], "weight_decay": 0.0}]
    if optimizer == "muon":
        from model.muon import Muon

        # no weight decay on the Muon matrices: their orthogonalised steps already have a fixed size
        groups.append({"params": muon_matrices, "use_muon": True, "weight_decay": 0.0})
        return Muon(groups, momentum=muon_momentum, betas=betas)
    # Fused AdamW updates all parameters in one kernel instead of a dozen per tensor: on CUDA,
    # and on the CPU too (measured 14% faster for the small CPU model). Apple's mps: the default.
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
