"""What the app shows, apart from the runtime: status lines and charts (ui), the round view and its tree figure,
the locality view, the 'why this speed' panel, and the app's cache of loaded sessions. The runtime never imports it."""
