from edgetl.cli import main

raise SystemExit(main())
