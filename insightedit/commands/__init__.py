"""Subcommands of ``insightedit`` beyond Lightning's: each module has ``main(argv) -> int``."""
