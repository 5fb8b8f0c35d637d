// The document itself needs the API key: take the one the generation page saved, or ask for it.
"use strict";
(function () {
  let key = localStorage.getItem("apiKey");
  if (!key) {
    key = window.prompt("API key (sent as x-api-key; kept in this browser):") || "";
    localStorage.setItem("apiKey", key);
  }
  const ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    requestInterceptor: (request) => {
      if (!request.headers["x-api-key"]) request.headers["x-api-key"] = localStorage.getItem("apiKey") || "";
      return request;
    },
    onComplete: () => ui.preauthorizeApiKey("ApiKey", localStorage.getItem("apiKey") || ""),
  });
})();
