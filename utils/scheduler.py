"""Learning-rate schedules, stepped once per iteration (reference §1.2 step 6)."""
from torch.optim.lr_scheduler import LambdaLR


def poly_lr(optimizer, max_iters: int, power: float = 0.9) -> LambdaLR:
    """lr_k = base_lr * (1 - k / max_iters) ** power."""
    max_iters = max(1, max_iters)
    return LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / max_iters) ** power)
