from hintscope.cli import main

raise SystemExit(main())
