// Swagger UI for /openapi.json (public); the key goes in through its Authorize dialog, never a prompt.
"use strict";
(function () {
  const ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    // Keeps what was entered in Authorize across reloads (in local storage), until Logout.
    persistAuthorization: true,
    onComplete: () => {
      // A key saved by the generation page is offered as the authorization, unless one was entered here.
      const saved = localStorage.getItem("apiKey");
      if (saved && !ui.authSelectors.authorized().size) ui.preauthorizeApiKey("ApiKey", saved);
    },
  });
})();
