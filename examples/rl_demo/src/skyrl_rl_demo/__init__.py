"""An RL training loop that selects its inference backend by name (``make demo``).

Modules, each with one job: :mod:`~skyrl_rl_demo.env` (the multi-turn environment interface and the
task), :mod:`~skyrl_rl_demo.agent_loop` (rollouts, loss masks, rollout log-probabilities),
:mod:`~skyrl_rl_demo.grpo` (advantages and the policy loss), :mod:`~skyrl_rl_demo.weight_transfer`
(trainer to engine), :mod:`~skyrl_rl_demo.trainer` (the loop), :mod:`~skyrl_rl_demo.metrics` and
:mod:`~skyrl_rl_demo.plots` (what a run leaves behind), :mod:`~skyrl_rl_demo.cli`.
"""

__version__ = "0.1.0"
