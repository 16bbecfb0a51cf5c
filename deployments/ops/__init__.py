"""What the admin commands drive on a running app: rollouts and cost figures."""
