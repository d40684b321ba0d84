"""`python -m hpcqwen ...` is the `hpcqwen` console script."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["launch"]:  # the per-node launcher: a stop signal during the imports below is kept
        from hpcqwen.supervisor import catch_early

        catch_early()
    from hpcqwen.cli import main

    sys.exit(main())
