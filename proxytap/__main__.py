from proxytap.cli import main

raise SystemExit(main())
