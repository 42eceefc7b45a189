"""`python -m planner`: the deployment planner's command line (planner/cli.py); `python -m planner predict ...`:
one given deployment at given loads (planner/predict.py)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["predict"]:
        from planner.predict import main as predict_main

        predict_main(sys.argv[2:])
    else:
        from planner.cli import main

        main()
