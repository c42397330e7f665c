"""The arena: every architecture trained on the same synthetic memory tasks at matched size, then measured.

    from seqlab.arena import BUDGETS, run_arena
    document = run_arena(BUDGETS["cpu"], tasks=["selective_copy", "mqar"], seeds=[0], out="arena-out")
"""

from seqlab.arena.budgets import BUDGETS, Budget, ModelPlan, TaskPlan, get_budget, match_width
from seqlab.arena.run import PUBLISHED, run_arena

__all__ = ["BUDGETS", "PUBLISHED", "Budget", "ModelPlan", "TaskPlan", "get_budget", "match_width", "run_arena"]
