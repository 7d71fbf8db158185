from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config import second_factor
from pipeline.ops import views as pipeline_views

urlpatterns = [
    path("healthz", pipeline_views.healthz, name="healthz"),
    path("readyz", pipeline_views.readyz, name="readyz"),
    path("metrics", pipeline_views.metrics, name="metrics"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/second-factor/", second_factor.second_factor, name="second_factor"),
    path("admin/", admin.site.urls),
    path("ops/", include("pipeline.ops.urls")),
    path("", include("visits.urls")),
]
