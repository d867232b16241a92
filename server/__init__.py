"""The crq queue server: event-sourced state, CR journal, snapshots, HTTP API."""
