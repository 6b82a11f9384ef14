from fastmesh.cli import main

raise SystemExit(main())
