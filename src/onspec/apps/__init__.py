"""The commands, over the library: `replay` (a query stream, static or online), `distill`
(offline), `bench` (ways of decoding, interleaved), `serve` (the HTTP server's process).
Library packages (engine, models, online, pool, serve, bench peers) never import from here."""
