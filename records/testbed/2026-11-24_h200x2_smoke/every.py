"""train_gpt.main() with every training step logged (LOG_EVERY = 1), for the multi-GPU loss comparison."""
import os
import sys

sys.path.insert(0, os.getcwd())
import train_gpt as tg  # noqa: E402

tg.LOG_EVERY = 1
tg.main()
