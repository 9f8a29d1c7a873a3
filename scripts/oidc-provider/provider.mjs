// A real OpenID Connect provider for mailplatform's SSO tests (panva/oidc-provider).
// Configuration comes from the environment so each test run chooses its ports and keys:
//   ISSUER, PORT, CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, JWKS (private JWK set, JSON),
//   ACCOUNTS (JSON: {"alice@corp.test": {"name": "Alice", "groups": ["mail-admins"]}}).
// Every account answers to any password (devInteractions); consent is granted automatically.
import Provider from "oidc-provider";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is required`);
  return value;
};

const accounts = JSON.parse(process.env.ACCOUNTS || "{}");
const clientId = env("CLIENT_ID");

const provider = new Provider(env("ISSUER"), {
  clients: [
    {
      client_id: clientId,
      client_secret: env("CLIENT_SECRET"),
      redirect_uris: [env("REDIRECT_URI")],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_post",
    },
  ],
  jwks: JSON.parse(env("JWKS")),
  scopes: ["openid", "email", "profile", "groups"],
  claims: { openid: ["sub"], email: ["email", "email_verified"], profile: ["name"], groups: ["groups"] },
  cookies: { keys: ["mailplatform-test-cookie-key"] },
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    const account = accounts[id] || {};
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: account.email || id,
          email_verified: account.email_verified ?? true,
          name: account.name || id,
          groups: account.groups || [],
        };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope("openid email profile groups");
    await grant.save();
    return grant;
  },
});

provider.listen(Number(env("PORT")), "127.0.0.1", () => {
  console.log(`oidc-provider ready at ${env("ISSUER")}`);
});
