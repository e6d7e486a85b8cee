"""Learning-rate policy of the dense configs: mmcv ``PolyLrUpdaterHook`` with linear warm-up, per iteration."""

__all__ = ["poly_warmup_lr", "set_lr"]


def poly_warmup_lr(base_lr, iteration, max_iters, power=1.0, min_lr=0.0, warmup_iters=0, warmup_ratio=1e-6):
    """lr of a group at 0-based ``iteration`` (the value mmcv sets before that iteration runs).

    ``poly = (base_lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr``; during the first
    ``warmup_iters`` iterations it is multiplied by ``1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)``.
    """
    lr = (base_lr - min_lr) * (1.0 - iteration / max_iters) ** power + min_lr
    if warmup_iters and iteration < warmup_iters:
        k = (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
        lr = lr * (1.0 - k)
    return lr


def set_lr(optimizer, iteration, max_iters, power=1.0, min_lr=0.0, warmup_iters=0, warmup_ratio=1e-6):
    """Set every group's lr from its ``initial_lr`` (the layer-decayed base); returns the first group's."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = poly_warmup_lr(group["initial_lr"], iteration, max_iters, power, min_lr,
                                     warmup_iters, warmup_ratio)
    return optimizer.param_groups[0]["lr"]
