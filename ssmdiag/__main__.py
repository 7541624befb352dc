"""`python -m ssmdiag` (also what `accelerate launch -m ssmdiag` runs)."""

from .cli import main

main()
