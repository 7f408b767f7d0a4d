"""hintscope: observe free page hinting against dirty-log syncs during live migration."""

__version__ = "0.1.0"
