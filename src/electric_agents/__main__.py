from electric_agents.cli import main

raise SystemExit(main())
