"""`python -m ssmdiag` (also what `accelerate launch -m ssmdiag` runs)."""

from ._syspath import drop_repo_root

drop_repo_root()

from .cli import main  # noqa: E402

main()
