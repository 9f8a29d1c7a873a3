"""Server-rendered pages: public (home, sign-in, temporary inboxes), the inbox and the console."""
