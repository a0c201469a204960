"""Ops: one module per branch, each a launcher per kernel plus an autograd Function."""
