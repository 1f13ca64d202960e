from apix_trio.cli import main

raise SystemExit(main())
