"""AutoCache: the frozen prefix's outputs, stored so later epochs skip the frozen blocks.

store.py holds the rows (tiers, budgets, prefetch, advance); policy.py decides (pure, no
torch: the planner reads it); `cache.AutoCache` wires them to a run: it opens the cache at
the first frozen prefix (auto: only if reading measures faster than recomputing), advances
it when more blocks freeze, and serves the first stage's inputs from it.
"""
