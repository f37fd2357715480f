from autopart.cli import main

raise SystemExit(main())
