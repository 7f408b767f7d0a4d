"""An outsider's harness: migrate a free-page-hinting guest with plain QEMU command lines and QMP,
attach hintscope's host probe (and its migration-stream tap when there is one) from the command
line, and judge the result by comparing both sides' memory page by page.

Nothing here imports hintscope.lab except its guest builder, so the harness sees hintscope only
as a third-party VMM engineer would: `python -m hintscope probe host`, `tap` and `analyze`.

vm.py        QEMU command lines, processes and the guest's serial log
tools.py     the hintscope command-line tools (probe, tap, analyze) as subprocesses
memcheck.py  pmemsave of both sides and the page-by-page comparison
run.py       one scenario end to end -> Result
table.py     the issue-11 table: QEMU version x behaviour
"""
