"""fastlayers.bench: benchmark suites, FLOP counts, the machine's peak, the CLI."""
