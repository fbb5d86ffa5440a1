"""What every entry script and tool shares, below the tasks.

  console.py    the command's own lines, progress bars, PaddleNLP's log level
  arguments.py  flags into argument dataclasses (one-line errors), a recipe followed by flags
  process.py    running as a command: every core, one-line errors, Ctrl-C and SIGTERM
"""
