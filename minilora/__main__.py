from minilora.cli.main import main

raise SystemExit(main())
