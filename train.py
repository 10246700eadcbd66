"""`python train.py recipe=NAME key=value ...` in the repository; installed, the same is `draftsmith-train`."""

from draftsmith.training.cli import main

if __name__ == "__main__":
    main()
