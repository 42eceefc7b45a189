"""`python -m planner`: the deployment planner's command line (planner/cli.py)."""

from planner.cli import main

if __name__ == "__main__":
    main()
