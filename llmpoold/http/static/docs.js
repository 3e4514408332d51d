// Swagger UI over this daemon's /openapi.json. Keys typed into "Authorize" stay in the page.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  defaultModelsExpandDepth: 1,
  tryItOutEnabled: false,
});
