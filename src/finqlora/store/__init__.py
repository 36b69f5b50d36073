"""Stage 1, the market-event store: a SQLite database compatible with finance_analysis.db
(events, event_impacts), news and price ingestion, event-study returns, the synthetic sample
store."""
