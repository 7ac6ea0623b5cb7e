"""Reinforcement learning from feedback: rewards, and PPO where TRL no longer offers it."""
