"""The token MDP: the task base class (``task``), its Gymnasium environments (``env``) and
the exact solver (``solver``)."""
