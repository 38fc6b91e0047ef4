"""STaR (Self-Taught Reasoner, Zelikman et al. 2022) on top of `mesh_transformer`.

`star.tasks` holds one module per task (question formats, few-shot prompts, answer parsing, the exact formats of the
original `ezelikman/STaR` code); `star.verify` checks the intermediate steps of a rationale where a task has checkable
steps. This package imports no jax: the task code is plain Python so that data tools and tests stay fast.
"""
