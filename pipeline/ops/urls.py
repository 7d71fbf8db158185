from django.urls import path

from pipeline.ops import views

app_name = "pipeline"

urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
]
