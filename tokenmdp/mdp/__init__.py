"""The token MDP: tasks and Gymnasium environments (``env``), the exact solver (``solver``)."""
